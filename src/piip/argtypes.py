"""Argument types of the ``piip`` command line, shared by the CLI and the tasks' ``piip eval``
options: each turns bad input into argparse's one-line error naming the option."""
from __future__ import annotations

import argparse

__all__ = ["POSITIVE", "NON_NEGATIVE", "POSITIVE_FLOAT", "fraction", "device", "device_problem", "check_device",
           "DTYPES"]

#: autocast dtypes by name: the keys of piip.precision.AUTOCAST_DTYPES (not imported here: it imports
#: torch, which the parser does not need)
DTYPES = ("fp32", "bf16", "fp16")


def _bounded(convert: type, in_range, bound: str):
    """An argparse type: ``convert(text)`` when ``in_range`` of it holds, else argparse's one-line
    error naming the option, the bound and the value."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {convert.__name__} value: {text!r}") from None
        if not in_range(value):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    parse.__name__ = convert.__name__
    return parse


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    return _bounded(int, lambda value: value >= low, f">= {low}")


def fraction(low_open: bool):
    """An argparse type: a float in (0, 1] (``low_open``) or [0, 1]."""
    if low_open:
        return _bounded(float, lambda value: 0 < value <= 1, "in (0, 1]")
    return _bounded(float, lambda value: 0 <= value <= 1, "in [0, 1]")


POSITIVE, NON_NEGATIVE = _int_at_least(1), _int_at_least(0)
#: a finite float > 0
POSITIVE_FLOAT = _bounded(float, lambda value: 0 < value < float("inf"), "> 0")


def device_problem(device: str) -> str | None:
    """Why torch cannot place tensors on ``device`` here (``None``: it can, or ``auto``)."""
    if device in ("cpu", "auto"):
        return None
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return "not a device (cpu, cuda, cuda:1, ...)"
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available here (use cpu)"
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def check_device(name: str, what: str) -> str:
    """``name`` when torch can use it here, else a one-line :class:`ValueError` naming ``what``."""
    problem = device_problem(name)
    if problem:
        raise ValueError(f"{what}={name!r}: {problem}")
    return name


def device(text: str) -> str:
    """The argparse type of ``--device``."""
    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text
