"""Short training loops over the primitives: sft, rl, dpo, distill.

Each module has a Config dataclass, `main(config)` and `python -m workbench.recipes.<name>`;
shared steps (CLI, metrics.jsonl, checkpoint/resume, the fb + optim step) live in `common`.
Modules are imported on use: `from workbench.recipes import rl`.
"""
