"""Model surgery: which guide modules a recipe claims (matching), their shapes (trace), the replacement plan or
the architecture-transfer plan, and the progressive schedule of stages."""

from theseus_cli.surgery.plan import Plan, PlanEntry, apply_entries, build_plan

__all__ = ["Plan", "PlanEntry", "apply_entries", "build_plan"]
