"""Test setup: every Triton kernel runs in the interpreter on CPU tensors; the fuzz
tests' tally is printed at the end of the session."""
import os
import sys

from pyvit_ops.testing import interpreter

# Must happen before any pyvit_ops kernel module is imported (triton.jit decides
# at decoration time whether a kernel is interpreted).
interpreter.enable()


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
