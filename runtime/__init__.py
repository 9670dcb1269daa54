"""Integer runtimes of the IR: the reference interpreter, C code generation, gcc build/run helpers."""
from .build import build, run
