"""IPython extension: %tinker magics and live widgets (depends on workbench only). Built in the Jupyter issue."""
