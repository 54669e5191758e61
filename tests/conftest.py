import os
import sys

# Tests import the flat modules (clip, llama, tinyllava, data, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "torchrun: launches train.py under torchrun (gloo, 2 CPU processes); part of "
                                       "the default run, `-m 'not torchrun'` leaves them out")
