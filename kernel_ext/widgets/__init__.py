"""Widgets: views of SDK objects, fed by listeners and the server's event stream.

Each widget is a plain object holding ipywidgets / plotly FigureWidgets (`.widget` or
`.fig`), displays itself through `_repr_mimebundle_` (live widget in a kernel, HTML and
text snapshots elsewhere) and is released with `.close()`.
"""

from workbench.events import EventStream  # the SDK's, re-exported for old imports

from .common import Throttle, downsample, ema
from .loss_curve import LossCurve
from .metrics_plot import MetricsPlot
from .monitor import ServerMonitor
from .rollouts import RolloutDashboard
from .step_panel import StepPanel
from .token_inspector import TokenInspector

__all__ = ["EventStream", "LossCurve", "MetricsPlot", "RolloutDashboard", "ServerMonitor", "StepPanel",
           "Throttle", "TokenInspector", "downsample", "ema"]
