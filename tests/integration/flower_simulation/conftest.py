"""The simulated Flower run (its own venv, .venv-flower-sim: Flower with Ray)."""

collect_ignore = ["sim_child.py"]
