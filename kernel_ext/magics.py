"""%tinker: drive and watch a Tinker Workbench server from a notebook.

Load with ``%load_ext kernel_ext``. Every subcommand calls the same public SDK that scripts
use (``import workbench``); widgets update from background threads, so cells return at once.
VAR / EXPR arguments are evaluated in the notebook's namespace; quote an EXPR that has spaces.

Connection
  %tinker start [--models M]          start the embedded local server and connect to it
  %tinker connect [URL] [--key K] [--server-key Z85]
                                      connect to URL (default: $WORKBENCH_URL, else embedded);
                                      --server-key: the public key of a CURVE server
  %tinker stop                        detach widgets (they stay on screen, frozen, controls off);
                                      stop the embedded server if we started it
  %tinker status                      URL, protocol, tenant, current cycle, models
  %tinker models                      base models the server offers
  %tinker runs                        your training runs (RestClient)
  %tinker checkpoints [RUN]           checkpoints of RUN, or all of yours (RestClient)
  The connected ServiceClient is returned: ``service = %tinker connect``.

Views
  %tinker watch VAR [VAR ...] [--metric M] [--smoothing S]
        live loss curve of training clients (forward_backward = training points, forward =
        eval points); several runs share one figure; at most 4 redraws a second, curves
        downsampled to ~2k points. Above the figure: each run's base model, LoRA rank,
        trainable parameters and server, and a slider for the EMA smoothing (--smoothing,
        0 = raw). Returns the LossCurve.
  %tinker plot PATH [PATH ...] [--metric NAME ...] [--smoothing S]
        compare 1-4 finished (or running) runs from their metrics.jsonl files (the recipes'
        and the tinker-cookbook's: one JSON object per line, `step` and metric keys); PATH:
        a metrics.jsonl or a directory holding one. One panel per metric (default: the
        reward, else the loss), one colour per run: raw values faint, EMA-smoothed bold, with
        a smoothing slider (--smoothing, default 0.6). Returns the MetricsPlot.
  %tinker inspect EXPR [--renderer NAME] [--client VAR] [--tokenizer VAR] [--model NAME]
        token view of a Datum, a list of Datums, or a conversation (list of {role, content})
        built with renderer NAME. Colours: trained green, masked grey, negative weight red;
        hover shows id, text, weight, logprob. With --client, "score" runs a forward pass to
        colour by per-token loss and diff against the first scoring. Returns a TokenInspector.
  %tinker step VAR --batches EXPR [--lr X] [--loss-fn NAME] [--run-n N]
        control panel for a training client: forward_backward, optim_step, step, undo (rewind
        the last optim_step), run N, pause / resume, learning rate (--lr) and the N of run N
        (--run-n, default 10). Buttons enqueue work for a background worker.
        EXPR: a list of batches (cycled), a flat list of Datums (one batch), or an iterator.
  %tinker rewind VAR [N]
        undo the last N (default 1) optim_steps of training client VAR (TrainingClient.rewind):
        weights and optimizer state exactly as before them, gradients since discarded. The
        server keeps a few steps (its --rewind-depth); asking for more changes nothing.
  %tinker rollouts [EXPR] [--tokenizer VAR] [--kl-threshold X]
        RL rollout dashboard: groups -> samples with reward, advantage and a per-token
        logprob strip; zero-variance groups flagged. EXPR: a list of groups (or an iterator,
        consumed in the background); feed more with ``dash.extend(groups, step=i)`` or
        ``dash.add_group(g)``. Click a bar of the reward histogram to list only the samples
        in that reward bin, a step of the per-step reward (or KL) chart to list that step's
        groups ("clear" undoes; ``dash.filter_reward(lo, hi)``, ``dash.show_step(i)``,
        ``dash.clear_filter()``). Sampler-vs-trainer KL per step, from samples carrying
        `trainer_logprobs` or ``dash.add_kl(step, workbench.rl.sampler_trainer_kl(batch,
        fb_output))``; a warning banner when |KL| > X (default 0.01).
  %tinker monitor
        live server view from its event stream: tenants, tokens, seconds per cycle, queue.
  %tinker sample VAR "prompt" [--n N] [--max-tokens M] [--temperature T] [--seed S]
                [--chat] [--renderer NAME]
        sample from a SamplingClient (or a TrainingClient's current weights); completions
        shown with per-token logprobs. Returns the SampleResponse view.
  %tinker compare A B --prompts EXPR [--max-tokens M] [--temperature T] [--seed S]
                [--chat] [--renderer NAME] [--tokenizer VAR]
        the same prompts, with the same seed (drawn if not given), through two models;
        generations side by side, every token coloured by its probability under both (fill:
        A, underline: B; hover shows both logprobs), the first token where they differ ringed.
        A, B: a SamplingClient, a TrainingClient (its current weights), a checkpoint path
        (wb://... or tinker://..., or a variable holding one), or `base`: the base model of
        the other side (``%tinker compare tc base --prompts qs --chat``: SFT before/after).
        EXPR: a string, or a list of strings / ModelInputs / token lists; --chat asks each
        string as a user turn through the renderer (as sample --chat). Returns a CompareView
        (`.comparisons[i]`: prompt, `.a` / `.b` with tokens, lp_a, lp_b, text; divergence).

As a cell magic, ``%%tinker sample VAR [options]`` takes the prompt from the cell body.
Widgets fall back to HTML snapshots and text where they cannot render (terminals,
nbconvert); executed notebooks store no widget state.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from typing import Any, Optional

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class

from . import render


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}\n{self.format_usage().strip()}")

    def exit(self, status: int = 0, message: Optional[str] = None) -> None:  # type: ignore[override]
        raise UsageError(message or self.format_help())


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="%tinker", add_help=False)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="SUBCOMMAND")
    p = sub.add_parser("start", add_help=False)
    p.add_argument("--models", default="")
    p = sub.add_parser("connect", add_help=False)
    p.add_argument("url", nargs="?")
    p.add_argument("--key")
    p.add_argument("--server-key", dest="server_key")
    for name in ("stop", "status", "models", "runs", "monitor"):
        sub.add_parser(name, add_help=False)
    p = sub.add_parser("checkpoints", add_help=False)
    p.add_argument("run", nargs="?")
    p = sub.add_parser("watch", add_help=False)
    p.add_argument("clients", nargs="+")
    p.add_argument("--metric", default="loss:sum")
    p.add_argument("--smoothing", type=float, default=0.9)
    p = sub.add_parser("plot", add_help=False)
    p.add_argument("paths", nargs="+")
    p.add_argument("--metric", dest="metrics", action="extend", nargs="+", default=[])
    p.add_argument("--smoothing", type=float, default=0.6)
    p = sub.add_parser("inspect", add_help=False)
    p.add_argument("expr")
    p.add_argument("--renderer")
    p.add_argument("--client")
    p.add_argument("--tokenizer")
    p.add_argument("--model")
    p = sub.add_parser("step", add_help=False)
    p.add_argument("client")
    p.add_argument("--batches", required=True)
    p.add_argument("--lr", type=_non_negative_float, default=1e-4)
    p.add_argument("--loss-fn", default="cross_entropy")
    p.add_argument("--run-n", type=int, default=10)
    p = sub.add_parser("rewind", add_help=False)
    p.add_argument("client")
    p.add_argument("steps", nargs="?", type=_positive_int, default=1)
    p = sub.add_parser("rollouts", add_help=False)
    p.add_argument("expr", nargs="?")
    p.add_argument("--tokenizer")
    p.add_argument("--kl-threshold", type=float, default=1e-2)
    p = sub.add_parser("sample", add_help=False)
    p.add_argument("client")
    p.add_argument("prompt", nargs="?")
    p.add_argument("--n", type=_positive_int, default=1)
    p.add_argument("--max-tokens", type=_positive_int, default=32)
    p.add_argument("--temperature", type=_non_negative_float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--renderer")
    p = sub.add_parser("compare", add_help=False)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--prompts", required=True)
    p.add_argument("--max-tokens", type=_positive_int, default=32)
    p.add_argument("--temperature", type=_non_negative_float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--renderer")
    p.add_argument("--tokenizer")
    return parser


def parse(line: str) -> argparse.Namespace:
    """`%tinker` arguments -> a typed namespace (UsageError on bad input)."""
    try:
        argv = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"%tinker: cannot parse {line!r}: {exc}") from None
    if not argv:
        raise UsageError("%tinker needs a subcommand; see %tinker? for the list")
    return build_parser().parse_args(argv)


@dataclass
class Session:
    """What %tinker holds between cells: the connection and the widgets it made."""

    service: Any = None
    started_embedded: bool = False
    widgets: list = field(default_factory=list)
    monitor: Any = None


@dataclass
class TextView:
    """A table or message with HTML and text forms."""

    html: str
    text: str

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return self.text


def _table(headers: list[str], rows: list[list[Any]], cls: str) -> TextView:
    return TextView(render.table_html(headers, rows, cls), render.table_text(headers, rows))


@magics_class
class TinkerMagics(Magics):
    def __init__(self, shell: Any):
        super().__init__(shell)
        self.session = Session()

    @line_cell_magic
    def tinker(self, line: str, cell: Optional[str] = None) -> Any:
        args = parse(line)
        if cell is not None:
            if args.command != "sample":
                raise UsageError("%%tinker as a cell magic is for `sample` (the cell body is the prompt)")
            args.prompt = cell.rstrip("\n")
        handler = getattr(self, "_cmd_" + args.command)
        return handler(args)

    tinker.__doc__ = __doc__

    # ------------------------------------------------------------- helpers

    def _value(self, expr: str, what: str) -> Any:
        try:
            return eval(expr, self.shell.user_ns)  # the user's own expression in their namespace
        except Exception as exc:
            raise UsageError(f"%tinker: cannot evaluate {what} {expr!r}: {type(exc).__name__}: {exc}") from None

    def _service(self) -> Any:
        if self.session.service is None:
            raise UsageError("not connected: run `%tinker start` or `%tinker connect URL --key K` first")
        return self.session.service

    def _keep(self, widget: Any) -> Any:
        self.session.widgets.append(widget)
        return widget

    def _events(self, required: bool = True) -> Any:
        if self.session.service is None:
            if required:
                self._service()
            return None
        try:
            return self.session.service.events()
        except RuntimeError as exc:
            if required:
                raise UsageError(str(exc)) from None
            return None

    # ---------------------------------------------------------- connection

    def _connect(self, url: Optional[str], key: Optional[str], server_key: Optional[str] = None) -> Any:
        import workbench

        try:
            service = workbench.ServiceClient(base_url=url, api_key=key, server_public_key=server_key)
        except (ValueError, workbench.WorkbenchError, RuntimeError) as exc:
            raise UsageError(f"%tinker: could not connect: {exc}") from None
        self.session.service = service
        self.session.started_embedded = service.local_server is not None
        return service

    def _cmd_start(self, args: argparse.Namespace) -> Any:
        import os

        if args.models:
            os.environ["WORKBENCH_LOCAL_MODELS"] = args.models
        saved = os.environ.pop("WORKBENCH_URL", None)  # start means the embedded server
        try:
            return self._connect(None, None)
        finally:
            if saved is not None:
                os.environ["WORKBENCH_URL"] = saved

    def _cmd_connect(self, args: argparse.Namespace) -> Any:
        return self._connect(args.url, args.key, args.server_key)

    def _cmd_stop(self, args: argparse.Namespace) -> TextView:
        from workbench.events import EventStream

        for widget in self.session.widgets:
            widget.detach()  # not close(): what a session drew stays readable after it ends
        EventStream.close_all()
        service, embedded = self.session.service, self.session.started_embedded
        self.session = Session()
        if service is None:
            return TextView("<i>not connected</i>", "not connected")
        service.close()
        if embedded and service.local_server is not None:
            service.local_server.stop()
            msg = f"stopped the embedded server at {service.base_url}"
        else:
            msg = f"disconnected from {service.base_url} (the server keeps running)"
        return TextView(f"<span>{msg}</span>", msg)

    def _cmd_status(self, args: argparse.Namespace) -> TextView:
        service = self._service()
        info = service.server_info
        models = [m.model_name for m in service.get_server_capabilities().supported_models]
        events = self._events(required=False)
        cycle = events.latest.get("cycle") if events is not None and events.latest else info.get("cycle")
        log = getattr(service.local_server, "log_path", None) if service.local_server is not None else None
        rows = [["url", service.base_url], ["embedded", service.local_server is not None],
                *([["server log", log]] if log else []),
                ["protocol", info.get("protocol", "-")], ["server", info.get("server", "-")],
                ["tenant", info.get("tenant", "-")], ["cycle", cycle if cycle is not None else "-"],
                ["models", ", ".join(models)]]
        return _table(["field", "value"], rows, "wb-status")

    def _cmd_models(self, args: argparse.Namespace) -> TextView:
        models = self._service().get_server_capabilities().supported_models
        return _table(["model"], [[m.model_name] for m in models], "wb-models")

    def _rest(self) -> Any:
        return self._service().create_rest_client()

    def _cmd_runs(self, args: argparse.Namespace) -> TextView:
        reply = self._rest().list_training_runs().result()
        runs = getattr(reply, "training_runs", reply)
        rows = [[r.training_run_id, r.base_model, r.lora_rank, r.last_request_time or "-"] for r in runs]
        return _table(["run", "base model", "rank", "last request"], rows, "wb-runs")

    def _cmd_checkpoints(self, args: argparse.Namespace) -> TextView:
        rest = self._rest()
        future = rest.list_checkpoints(args.run) if args.run else rest.list_user_checkpoints()
        reply = future.result()
        checkpoints = getattr(reply, "checkpoints", reply)
        rows = [[c.checkpoint_type, c.path, c.time, c.size_bytes if c.size_bytes is not None else "-"]
                for c in checkpoints]
        return _table(["type", "path", "time", "bytes"], rows, "wb-checkpoints")

    # --------------------------------------------------------------- views

    def _cmd_watch(self, args: argparse.Namespace) -> Any:
        from .widgets import LossCurve

        clients = [(name, self._value(name, "training client")) for name in args.clients]
        for name, client in clients:
            if not hasattr(client, "add_listener") or not hasattr(client, "forward_backward"):
                raise UsageError(f"%tinker watch: {name} is a {type(client).__name__}, not a TrainingClient")
        try:
            curve = LossCurve(metric=args.metric, smoothing=args.smoothing)
        except ValueError as exc:
            raise UsageError(f"%tinker watch: {exc}") from None
        for name, client in clients:
            curve.attach(client, name=name)
        return self._keep(curve)

    def _cmd_plot(self, args: argparse.Namespace) -> Any:
        from .widgets.metrics_plot import MAX_RUNS, MetricsPlot, load_metrics, run_names

        if len(args.paths) > MAX_RUNS:
            raise UsageError(f"%tinker plot: at most {MAX_RUNS} runs at a time, got {len(args.paths)}")
        names = run_names(args.paths)
        if len(set(names)) < len(names):
            raise UsageError(f"%tinker plot: a run is named twice: {' '.join(args.paths)}")
        try:
            runs = {name: load_metrics(path) for name, path in zip(names, args.paths)}
            plot = MetricsPlot(runs, args.metrics, smoothing=args.smoothing, sources=dict(zip(names, args.paths)))
        except (OSError, ValueError) as exc:
            raise UsageError(f"%tinker plot: {exc}") from None
        return self._keep(plot)

    def _tokenizer_var(self, expr: str) -> Any:
        """A tokenizer from --tokenizer VAR: a tokenizer, or a client that has one."""
        tok = self._value(expr, "tokenizer")
        return tok.get_tokenizer() if hasattr(tok, "get_tokenizer") else tok

    def _tokenizer(self, args: argparse.Namespace, client: Any) -> Any:
        if args.tokenizer:
            return self._tokenizer_var(args.tokenizer)
        if client is not None:
            return client.get_tokenizer()
        if self.session.service is not None:
            service = self.session.service
            model = args.model or service.get_server_capabilities().supported_models[0].model_name
            return service.create_sampling_client(base_model=model).get_tokenizer()
        raise UsageError("%tinker inspect needs a tokenizer: pass --client VAR or --tokenizer VAR, or connect first")

    def _cmd_inspect(self, args: argparse.Namespace) -> Any:
        from workbench import types

        from .widgets import TokenInspector

        value = self._value(args.expr, "expression")
        client = self._value(args.client, "client") if args.client else None
        tokenizer = self._tokenizer(args, client)
        if isinstance(value, types.Datum):
            data, titles = [value], [args.expr]
        elif isinstance(value, (list, tuple)) and value and all(isinstance(d, types.Datum) for d in value):
            data, titles = list(value), [f"{args.expr}[{i}]" for i in range(len(value))]
        elif isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) and "role" in m for m in value):
            data, titles = [self._render_conversation(list(value), args.renderer, tokenizer)], [args.expr]
        else:
            raise UsageError(f"%tinker inspect: {args.expr} is a {type(value).__name__}; expected a Datum, "
                             "a list of Datums, or a conversation (list of {role, content}) with --renderer")
        try:
            return self._keep(TokenInspector(data, tokenizer, client, titles))
        except ValueError as exc:
            raise UsageError(f"%tinker inspect: {exc}") from None

    @staticmethod
    def _render_conversation(messages: list, renderer_name: Optional[str], tokenizer: Any) -> Any:
        from workbench.data import conversation_to_datum
        from workbench.renderers import get_renderer

        if not renderer_name:
            raise UsageError("%tinker inspect: a conversation needs --renderer NAME")
        try:
            renderer = get_renderer(renderer_name, tokenizer)
        except (KeyError, ValueError) as exc:
            raise UsageError(f"%tinker inspect: renderer {renderer_name!r}: {exc}") from None
        try:
            return conversation_to_datum(messages, renderer)
        except ValueError as exc:  # e.g. no assistant message to train on
            raise UsageError(f"%tinker inspect: renderer {renderer_name!r}: {exc}") from None

    def _cmd_step(self, args: argparse.Namespace) -> Any:
        from .widgets import StepPanel

        client = self._value(args.client, "training client")
        batches = self._value(args.batches, "batches")
        try:
            panel = StepPanel(client, batches, learning_rate=args.lr, loss_fn=args.loss_fn,
                              events=self._events(required=False), run_n=args.run_n)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"%tinker step: {exc}") from None
        return self._keep(panel)

    def _cmd_rewind(self, args: argparse.Namespace) -> TextView:
        from workbench.errors import InvalidRequestError

        client = self._value(args.client, "training client")
        if not hasattr(client, "rewind"):
            raise UsageError(f"%tinker rewind: {args.client} is a {type(client).__name__}, not a TrainingClient")
        try:
            out = client.rewind(args.steps).result()
        except InvalidRequestError as exc:
            raise UsageError(f"%tinker rewind: {exc}") from None
        msg = (f"rewound {args.client} by {out.steps} optim_step{'s' * (out.steps != 1)}: the run is at "
               f"step {out.step}; {out.rewindable} more can be undone")
        return TextView(f"<span>{msg}</span>", msg)

    def _cmd_rollouts(self, args: argparse.Namespace) -> Any:
        from .widgets import RolloutDashboard
        from .widgets.rollouts import groups_from

        tokenizer = self._tokenizer_var(args.tokenizer) if args.tokenizer else None
        try:
            dash = RolloutDashboard(tokenizer, kl_threshold=args.kl_threshold)
        except ValueError as exc:
            raise UsageError(f"%tinker rollouts: {exc}") from None
        if args.expr:
            value = self._value(args.expr, "rollout groups")
            try:
                if isinstance(value, (list, tuple)) or hasattr(value, "groups"):
                    dash.extend(groups_from(value))
                    dash.flush()
                elif hasattr(value, "__iter__"):
                    dash.feed(value)
                else:
                    raise TypeError(f"{args.expr} is a {type(value).__name__}, not rollout groups")
            except (TypeError, ValueError) as exc:
                dash.close()
                raise UsageError(f"%tinker rollouts: {exc}") from None
        return self._keep(dash)

    def _cmd_monitor(self, args: argparse.Namespace) -> Any:
        from .widgets import ServerMonitor

        if self.session.monitor is not None:
            self.session.monitor.close()
        self.session.monitor = self._keep(ServerMonitor(self._events()))
        return self.session.monitor

    @staticmethod
    def _chat_renderer(name: Optional[str], client: Any, tokenizer: Any, command: str = "sample") -> Any:
        """The renderer NAME, or the one recommended for the client's base model."""
        from workbench.renderers import get_recommended_renderer_name, get_renderer

        try:
            name = name or get_recommended_renderer_name(getattr(client, "base_model", ""))
            return get_renderer(name, tokenizer)
        except (KeyError, ValueError) as exc:
            raise UsageError(f"%tinker {command} --chat: {exc} (name one with --renderer)") from None

    def _cmd_sample(self, args: argparse.Namespace) -> Any:
        from workbench import types

        from .sample_view import SampleView

        if args.prompt is None:
            raise UsageError('%tinker sample needs a prompt: %tinker sample VAR "prompt"')
        client = self._value(args.client, "client")
        if hasattr(client, "save_weights_and_get_sampling_client"):
            client = client.save_weights_and_get_sampling_client()
        if not hasattr(client, "sample"):
            raise UsageError(f"%tinker sample: {args.client} is a {type(client).__name__}, not a sampling client")
        tokenizer = client.get_tokenizer()
        stop = None
        if args.chat or args.renderer:
            renderer = self._chat_renderer(args.renderer, client, tokenizer)
            model_input = renderer.build_generation_prompt([{"role": "user", "content": args.prompt}])
            stop = renderer.get_stop_sequences()
        else:
            model_input = types.ModelInput.from_ints(tokenizer.encode(args.prompt, add_special_tokens=False))
        params = types.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                                      stop=stop)
        response = client.sample(model_input, args.n, params).result()
        return SampleView(args.prompt, response, tokenizer)

    def _compare_side(self, spec: str, side: str) -> Any:
        """One side of compare as a sampling client: a checkpoint path (or a variable holding
        one), a SamplingClient, or a TrainingClient's current weights."""
        from workbench.errors import WorkbenchError

        value = spec if spec.startswith(("wb://", "tinker://")) else self._value(spec, f"side {side}")
        try:
            if isinstance(value, str):
                return self._service().create_sampling_client(model_path=value)
            if hasattr(value, "save_weights_and_get_sampling_client"):
                return value.save_weights_and_get_sampling_client()
        except (WorkbenchError, ValueError) as exc:
            raise UsageError(f"%tinker compare: side {side} ({spec}): {exc}") from None
        if not (hasattr(value, "sample") and hasattr(value, "compute_logprobs")):
            raise UsageError(f"%tinker compare: side {side} ({spec}) is a {type(value).__name__}; expected a "
                             "SamplingClient, a TrainingClient, a checkpoint path or `base`")
        return value

    def _cmd_compare(self, args: argparse.Namespace) -> Any:
        from workbench import types
        from workbench.errors import WorkbenchError

        from .compare_view import compare, prompts_from

        if args.a == "base" and args.b == "base":
            raise UsageError("%tinker compare: both sides are `base`; `base` is the base model of the other "
                             "side, so name a client or a checkpoint for one of them")
        service = self._service()
        a = None if args.a == "base" else self._compare_side(args.a, "A")
        b = None if args.b == "base" else self._compare_side(args.b, "B")
        labels = [args.a, args.b]
        if a is None or b is None:
            other = b if a is None else a
            try:
                base = service.create_sampling_client(base_model=other.base_model)
            except WorkbenchError as exc:
                raise UsageError(f"%tinker compare: base model {other.base_model}: {exc}") from None
            labels[0 if a is None else 1] = f"base ({other.base_model})"
            a, b = (base, b) if a is None else (a, base)
        tokenizer = self._tokenizer_var(args.tokenizer) if args.tokenizer else a.get_tokenizer()
        if a.base_model != b.base_model and not args.tokenizer and _vocab(tokenizer) != _vocab(b.get_tokenizer()):
            raise UsageError(f"%tinker compare: A ({a.base_model}) and B ({b.base_model}) have different "
                             "tokenizers; a token-by-token comparison needs one vocabulary")
        renderer = self._chat_renderer(args.renderer, a, tokenizer, "compare") if args.chat or args.renderer else None
        try:
            prompts, texts = prompts_from(self._value(args.prompts, "prompts"), tokenizer, renderer)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"%tinker compare --prompts {args.prompts}: {exc}") from None
        params = types.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                                      stop=renderer.get_stop_sequences() if renderer is not None else None)
        try:
            return compare(a, b, prompts, params, (labels[0], labels[1]), texts, tokenizer)
        except WorkbenchError as exc:
            raise UsageError(f"%tinker compare: {exc}") from None


def _vocab(tokenizer: Any) -> Any:
    return tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else None
