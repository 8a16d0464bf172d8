"""`crescent experiment`: the paper's controlled experiments as grids of ordinary training runs (spec.py: the YAML
specs; plan.py: what runs next; runner.py: running and resuming the grid; report.py + analyses.py: tables, figures
and fits from MLflow; k8s.py: the grid as an Indexed Job)."""
