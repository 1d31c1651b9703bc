"""Reading runs, ours or another trainer's, without torch: a run's analysis (`runs`), the
entropy-performance law (`law`), intervals over seeds (`stats`), foreign logs (`foreign`), the
HTML reports (`report`, `comparison`).

`entroprl.analysis` was one module before (now `runs`); its names are served from there for one
release."""

from entroprl import _moved

__getattr__ = _moved.moved_names("entroprl.analysis", "entroprl.analysis.runs")
