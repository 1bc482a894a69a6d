"""On-device MoE scaling law and budget-driven architecture design (`python -m train.scaling`).

    sweep    a grid of short pre-training runs on the project corpus -> one JSON line each (sweep.py)
    fit      the loss law fitted to the sweep, leave-runs-out error, plots, coefficients (law.py)
    design   the predicted-best config under INT4 MB and decode GFLOPs/token budgets (design.py)

The law's variables and the budget accounting (the same as `python -m mobilemoe.config list`) live
in arch.py. Results of the committed sweep: train/runs/scaling/README.md.
"""
