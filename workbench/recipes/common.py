"""What every recipe shares: the config CLI, the JSONL metrics log, checkpoint/resume, and the
"submit forward_backward + optim_step, then wait" training step.

A recipe is a Config dataclass (a comment per field), `main(config)` and `cli(Config, main)`.
Its log directory holds:

    config.json        the config the run started with
    metrics.jsonl      one JSON object per step
    checkpoints.jsonl  one line per saved checkpoint: {"name", "step", "state_path", ...}

Resume: a run pointed at a log directory that already has checkpoints continues from the
last one (weights and Adam state) at the step after it.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

from .. import types


@dataclass(frozen=True)
class BaseConfig:
    """Fields every recipe has."""

    log_dir: str = "runs/recipe"  # metrics.jsonl, config.json and checkpoints.jsonl go here
    base_url: Optional[str] = None  # server URL; None: WORKBENCH_URL or an embedded local server
    api_key: Optional[str] = None  # the server's key; None: WORKBENCH_API_KEY
    base_model: str = "tiny-qwen3"  # a built-in tiny model, an HF directory or a cached hub id
    lora_rank: int = 16  # LoRA rank of the trained adapter
    seed: int = 0  # adapter initialisation and data order
    learning_rate: float = 1e-3  # Adam learning rate (LoRA wants ~10x full fine-tuning's)
    load_checkpoint_path: Optional[str] = None  # start from these weights (wb://.../weights/...)
    save_every: int = 0  # save state every N steps (0: only at the end)
    progress: bool = True  # print a start banner and show a tqdm progress bar
    renderer_name: Optional[str] = None  # chat renderer; None: the one recommended for base_model
    task: str = "recall"  # synthetic task of workbench.tasks (arithmetic, recall, reverse)
    n_train: int = 64  # training problems drawn from the task
    n_test: int = 16  # held-out problems (disjoint questions) for evaluation
    task_args: str = ""  # JSON object of the task's constructor arguments, e.g. {"n_keys": 4}


@dataclass
class RecipeResult:
    metrics: list[dict]  # what metrics.jsonl got, one dict per step run by this call
    state_path: Optional[str]  # the final weights + optimizer checkpoint
    sampler_path: Optional[str]  # the final weights for sampling
    log_dir: str


# ------------------------------------------------------------------------------ CLI

def _field_comments(cls: type) -> dict[str, str]:
    """`name: type = default  # comment` -> {name: comment}, over the class and its bases."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
            if m:
                out[m.group(1)] = m.group(2).strip()
    return out


def _converter(tp: Any) -> tuple[Callable[[str], Any], Optional[list]]:
    """(str -> value, choices) for a field type: int, float, str, bool, Optional, Literal."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        inner, choices = _converter(next(a for a in args if a is not type(None)))
        return (lambda s: None if s.lower() in ("none", "null") else inner(s)), choices
    if origin is typing.Literal:
        return type(args[0]), list(args)
    if tp is bool:
        def to_bool(s: str) -> bool:
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
        return to_bool, None
    if tp in (int, float, str):
        return tp, None
    raise TypeError(f"config fields must be int, float, str, bool, Optional or Literal; got {tp}")


def parse_config(cls: type, argv: Optional[Sequence[str]] = None, description: str = ""):
    """A Config from `--field value` flags, on top of an optional `--config file.json`."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a JSON file of field values (flags override it)")
    for f in dataclasses.fields(cls):
        convert, choices = _converter(hints[f.name])
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=convert,
                            choices=choices, default=argparse.SUPPRESS,
                            help=f"{comments.get(f.name, '')} (default: {f.default!r})")
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file:
        with open(config_file) as fh:
            values = json.load(fh)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            parser.error(f"{config_file}: unknown config fields {sorted(unknown)}")
    values.update(args)
    return cls(**values)


def cli(cls: type, main: Callable[[Any], Any], argv: Optional[Sequence[str]] = None) -> None:
    """The `python -m workbench.recipes.<name>` entry point: parse, run, print the result."""
    module = sys.modules[main.__module__]
    result = main(parse_config(cls, argv, module.__doc__ or ""))
    last = result.metrics[-1] if result.metrics else {}
    print(json.dumps({"log_dir": result.log_dir, "state_path": result.state_path,
                      "sampler_path": result.sampler_path, "last_metrics": last}))


# -------------------------------------------------------------------------- logging

class MetricsLog:
    """Appends one JSON line per step to <log_dir>/metrics.jsonl (appending keeps resumes whole)."""

    def __init__(self, log_dir: str, config: Any):
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self.rows: list[dict] = []
        with open(os.path.join(log_dir, "config.json"), "w") as fh:
            json.dump(dataclasses.asdict(config), fh, indent=1)

    def log(self, step: int, metrics: dict[str, Any]) -> dict:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        return row


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, bool, type(None))) else float(value)


def progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    """A tqdm bar over `iterable` (the iterable itself when disabled); `show` puts a step's
    loss / reward on it."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm  # a notebook bar in Jupyter, a text bar in a terminal

    return tqdm(iterable, total=total, desc=desc)


# Progress-bar postfix: label -> the metric keys that can fill it, first present wins.
POSTFIX_KEYS = {
    "loss": ("train/loss_per_token", "loss:sum"),
    "reward": ("env/reward_mean",),
    "acc": ("dpo/accuracy",),
    "kl": ("train/kl_sampler_trainer", "kl/sampler_reference"),
}


def show(bar: Iterable, metrics: dict[str, Any]) -> None:
    """Put the step's loss / reward / ... (whichever it has) in the bar's postfix."""
    if not hasattr(bar, "set_postfix"):
        return  # progress disabled: a plain iterable
    shown = {}
    for label, keys in POSTFIX_KEYS.items():
        key = next((k for k in keys if k in metrics), None)
        if key is not None:
            shown[label] = f"{float(metrics[key]):.4g}"
    bar.set_postfix(shown)


def print_banner(training_client, config: BaseConfig, title: str, start: int, **facts: Any) -> None:
    """The start banner (workbench.run_info): base model, rank, trainable parameters and
    server, then the recipe's own `facts` (batch size, ...), its steps and log dir. Printed
    when config.progress is on, like the bar."""
    from ..run_info import banner, run_facts

    if not config.progress:
        return
    n_steps = getattr(config, "n_steps", None)
    steps = None if n_steps is None else f"{n_steps}" + (f" (resuming at step {start})" if start else "")
    print(banner(title, run_facts(training_client, **facts, steps=steps, log_dir=config.log_dir)), flush=True)


# ---------------------------------------------------------------------- training

def make_service(config: BaseConfig):
    import workbench as wb

    return wb.ServiceClient(base_url=config.base_url, api_key=config.api_key)


def make_training_client(service, config: BaseConfig) -> tuple[Any, int]:
    """(training client, first step): resumed from log_dir's last checkpoint when there is one,
    else from config.load_checkpoint_path, else a fresh LoRA adapter."""
    last = last_checkpoint(config.log_dir)
    if last is not None:
        client = service.create_training_client_from_state_with_optimizer(last["state_path"])
        return client, int(last["step"]) + 1
    if config.load_checkpoint_path:
        return service.create_training_client_from_state(config.load_checkpoint_path), 0
    return service.create_lora_training_client(base_model=config.base_model, rank=config.lora_rank,
                                               seed=config.seed), 0


def train_step(training_client, data: Sequence[types.Datum], loss_fn: str, adam: types.AdamParams,
               loss_fn_config: Optional[dict] = None) -> dict[str, float]:
    """forward_backward and optim_step submitted back to back, then both awaited.

    Waiting on forward_backward before submitting optim_step would cost a server cycle per
    step. Returns the two calls' metrics merged (loss:sum, ...).
    """
    return train_step_output(training_client, data, loss_fn, adam, loss_fn_config)[0]


def train_step_output(training_client, data: Sequence[types.Datum], loss_fn: str, adam: types.AdamParams,
                      loss_fn_config: Optional[dict] = None) -> tuple[dict[str, float], Any]:
    """train_step, also returning forward_backward's output (per datum loss_fn_outputs, e.g.
    the trainer's logprobs)."""
    fb = training_client.forward_backward(list(data), loss_fn, loss_fn_config)
    return _await_step(fb, training_client.optim_step(adam)), fb.result()


def train_step_custom(training_client, data: Sequence[types.Datum], loss_fn: Callable,
                      adam: types.AdamParams) -> dict[str, float]:
    """train_step with a client-side loss (forward_backward_custom) instead of a built-in one."""
    fb = training_client.forward_backward_custom(list(data), loss_fn)
    return _await_step(fb, training_client.optim_step(adam))


def _await_step(fb, opt) -> dict[str, float]:
    """Wait on a submitted forward_backward and optim_step; their metrics merged."""
    metrics = dict(fb.result().metrics)
    metrics.update(opt.result().metrics or {})
    return metrics


def step_sampling_params(params: types.SamplingParams, config: BaseConfig,
                         step: int) -> types.SamplingParams:
    """`params` seeded for this step (rollouts vary the seed further per call), so a run, its
    rerun and its resume sample exactly the same tokens."""
    return params.model_copy(update={"seed": config.seed * 1_000_003 + step * 10_007})


def make_renderer(training_client, config: BaseConfig):
    """The config's renderer (or the base model's recommended one) on the run's tokenizer."""
    from .. import renderers

    name = config.renderer_name or renderers.get_recommended_renderer_name(training_client.base_model)
    return renderers.get_renderer(name, training_client.get_tokenizer())


def task_split(config: BaseConfig) -> tuple[list, list]:
    """(train, held-out) problems of config.task, drawn from config.seed."""
    return make_task(config).split(config.n_train, config.n_test, seed=config.seed)


def make_task(config: BaseConfig):
    """config.task built with config.task_args (a JSON object; "" for the defaults)."""
    from ..tasks import get_task

    try:
        kwargs = json.loads(config.task_args) if config.task_args.strip() else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"task_args must be a JSON object, got {config.task_args!r}: {exc}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"task_args must be a JSON object, got {config.task_args!r}")
    try:
        return get_task(config.task, **kwargs)
    except TypeError as exc:  # an argument the task's constructor does not take
        raise ValueError(f"task_args {config.task_args!r} do not fit task {config.task!r}: {exc}") from None


# -------------------------------------------------------------------- checkpoints

def _checkpoints_file(log_dir: str) -> str:
    return os.path.join(log_dir, "checkpoints.jsonl")


def last_checkpoint(log_dir: str) -> Optional[dict]:
    """The last line of <log_dir>/checkpoints.jsonl that has a state_path, or None."""
    path = _checkpoints_file(log_dir)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    rows = [r for r in rows if r.get("state_path")]
    return rows[-1] if rows else None


def save_checkpoint(training_client, log_dir: str, name: str, step: int,
                    sampler: bool = False) -> dict:
    """Save state (and sampler weights if asked) and record it in checkpoints.jsonl.

    `step` is the last completed step: a resume starts at step + 1.
    """
    state = training_client.save_state(name)
    sampler_future = training_client.save_weights_for_sampler(name) if sampler else None
    row = {"name": name, "step": step, "state_path": state.result().path}
    if sampler_future is not None:
        row["sampler_path"] = sampler_future.result().path
    os.makedirs(log_dir, exist_ok=True)
    with open(_checkpoints_file(log_dir), "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


def maybe_save(training_client, config: BaseConfig, step: int) -> None:
    """The periodic checkpoint: after every `save_every`-th step (never for save_every 0)."""
    if config.save_every > 0 and (step + 1) % config.save_every == 0:
        save_checkpoint(training_client, config.log_dir, f"step-{step:06d}", step)


def finish(training_client, config: BaseConfig, log: MetricsLog, last_step: int) -> RecipeResult:
    """Save the final state and sampler weights; the result main() returns."""
    row = save_checkpoint(training_client, config.log_dir, "final", last_step, sampler=True)
    return RecipeResult(log.rows, row["state_path"], row["sampler_path"], config.log_dir)
