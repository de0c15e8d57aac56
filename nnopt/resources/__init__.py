"""Data files shipped with nnopt (read with importlib.resources; see nnopt.text)."""
