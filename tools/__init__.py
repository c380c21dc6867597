"""Interactive tools that sit beside the pipeline (run by people, not by dvc repro)."""
