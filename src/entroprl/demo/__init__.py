"""`entroprl demo`: the race of methods (`race`) from a supervised warm start (`warmstart`) of a
tiny model (`models`) with a character tokenizer (`tokenizer`).

`entroprl.demo` was one module before (now `race`); its names are served from there for one
release."""

from entroprl import _moved

__getattr__ = _moved.moved_names("entroprl.demo", "entroprl.demo.race")
