"""IPython extension: %tinker magics and live widgets (depends on workbench only).

``%load_ext kernel_ext`` registers the ``%tinker`` magic; see ``%tinker?`` (the docstring of
kernel_ext.magics) for every subcommand. Widgets and plotting libraries load lazily, on the
first subcommand that needs them.
"""


def load_ipython_extension(ip) -> None:
    from .magics import TinkerMagics

    ip.register_magics(TinkerMagics)


def unload_ipython_extension(ip) -> None:
    magics = ip.magics_manager.registry.get("TinkerMagics")
    if magics is not None:
        magics._cmd_stop(None)
