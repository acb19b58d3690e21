"""Test setup: every Triton kernel runs in the interpreter on CPU tensors; the fuzz
tests' tally is printed at the end of the session."""
import os
import sys

from pyvit_ops.testing import interpreter

# Must happen before any pyvit_ops kernel module is imported (triton.jit decides
# at decoration time whether a kernel is interpreted).
interpreter.enable()


def pytest_report_header(config):
    # The versions a run saw: CI installs into a fresh environment, so these are what
    # a new user gets.
    from importlib import metadata

    names = ("torch", "triton", "timm", "hypothesis", "numpy")
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return "pyvit_ops test dependencies: " + ", ".join(found)


def pytest_terminal_summary(terminalreporter):
    # Only when the fuzz tests ran: importing the module here would need hypothesis.
    fuzz = sys.modules.get("pyvit_ops.testing.fuzz")
    if fuzz is None or not fuzz.TALLY.executions:
        return
    terminalreporter.section(f"fuzzed cases per operator and backend "
                             f"(max_examples={fuzz.examples_budget()} + edge examples)")
    for line in fuzz.TALLY.table():
        terminalreporter.write_line(line)
    path = os.environ.get(fuzz.ENV_REPORT)
    if path:
        fuzz.TALLY.write_json(path)
        terminalreporter.write_line(f"written to {path}")
