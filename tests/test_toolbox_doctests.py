"""The docstring examples of the toolbox modules run and print what they show."""

import doctest
import importlib

import pytest
import torch

MODULES = [
    "torchdefects.filters",
    "torchdefects.ellipse",
    "torchdefects.hysteresis",
    "torchdefects.shape",
    "torchdefects.region_filters",
    "torchdefects.severity",
    "torchdefects.normalize",
    "torchdefects.presets",
]


@pytest.mark.parametrize("name", MODULES)
def test_examples(name):
    mod = importlib.import_module(name)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(mod, name, globs={"torch": torch, **vars(mod)})
    assert any(t.examples for t in tests), f"{name} has no examples"
    for t in tests:
        runner.run(t)
    assert runner.failures == 0
