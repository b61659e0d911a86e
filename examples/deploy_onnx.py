"""Convert, export to ONNX, and run the exported file the way a deployment would: ONNX Runtime and numpy only.

A small CNN guide is trained on scikit-learn's 8×8 digits, converted to an all-Linear target, exported
with ``theseus export``'s library call, and the ``.onnx`` file is then used without PyTorch or theseus:
the preprocessing comes from the file's own ``theseus`` metadata. Its test accuracy must equal the
PyTorch target's. About half a minute on a laptop CPU:
    python examples/deploy_onnx.py [OUT_DIR]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from theseus_cli import ConvertOptions, run_conversion
from theseus_cli.data.dataset import load_dataset
from theseus_cli.deploy.export import ExportOptions, export_target
from theseus_cli.pipelines.train_guide import train_guide
from theseus_cli.config.recipe import parse_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from library_conversion import RECIPE  # noqa: E402  (the same conversion as the library example, then deployed)


def raw_test_images(recipe) -> tuple[np.ndarray, np.ndarray]:
    """The test split as a deployment receives it: pixels scaled to [0, 1], not yet normalised."""
    data = load_dataset(recipe.data, recipe.seed, recipe.task)
    mean = np.array(data.mean, np.float32)[None, :, None, None]
    std = np.array(data.std, np.float32)[None, :, None, None]
    return data.x_test.numpy() * std + mean, data.y_test.numpy()


def main(out: Path) -> dict:
    import onnxruntime as ort  # what the edge device runs

    recipe = parse_recipe(RECIPE, "examples/deploy_onnx.py")
    train_guide(recipe, out / "guide.safetensors", epochs=30, lr=3e-3, device="cpu")
    report = run_conversion(recipe, out / "run", ConvertOptions(checkpoint=out / "guide.safetensors", device="cpu", overwrite=True))
    exported = export_target(out / "run", "onnx", ExportOptions(overwrite=True))

    session = ort.InferenceSession(exported["out"], providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["theseus"])
    mean = np.array(meta["normalization"]["mean"], np.float32)[:, None, None]
    std = np.array(meta["normalization"]["std"], np.float32)[:, None, None]
    images, labels = raw_test_images(recipe)
    logits = session.run(None, {session.get_inputs()[0].name: ((images - mean) / std).astype(np.float32)})[0]
    accuracy = float((logits.argmax(1) == labels).mean())

    print(f"exported {exported['out']} ({exported['size_bytes']:,} bytes, {exported['exporter']} exporter, "
          f"max |Δ| vs PyTorch {exported['parity']['max_abs_diff']:.1e})")
    print(f"test accuracy: guide {report['metric']['guide']:.4f} | PyTorch target {report['metric']['target']:.4f} | "
          f"ONNX Runtime {accuracy:.4f}")
    return {"report": report, "export": exported, "onnx_accuracy": accuracy}


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
