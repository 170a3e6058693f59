"""The docstring examples run, and print what they say they print (doctest).

Each module of the package is one test; the examples make their own small data (a tokenizer
trained on three sentences, a PNG made with Pillow, a linear layer) and run in a temporary folder.
Examples that need a tracking server, a registry or a trained translation model are shown as code
blocks without ``>>>``, so they are not run.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import mlflow_fullmodel

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(mlflow_fullmodel.__path__, prefix="mlflow_fullmodel.")
    if not info.name.rsplit(".", 1)[-1].startswith("_")
)


def examples(module_name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(module_name)
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, module_name)
    return [test for test in tests if test.examples]


def run(test: doctest.DocTest, tmp_path) -> tuple[doctest.TestResults, str]:
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)  # examples that write files write them here
        runner.run(test, out=report.append, clear_globs=True)
    return runner.summarize(verbose=False), "".join(report)


@pytest.mark.parametrize("module_name", [*MODULES, "mlflow_fullmodel"])
def test_the_examples_of_each_module_print_what_they_say(module_name, tmp_path):
    failures = []
    for test in examples(module_name):
        results, report = run(test, tmp_path)
        if results.failed:
            failures.append(report)
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


def test_most_public_entry_points_have_an_example_that_runs():
    # Guards the test above against examples that stop being doctests (no ``>>>``) or are skipped.
    ran = 0
    for module_name in [*MODULES, "mlflow_fullmodel"]:
        for test in examples(module_name):
            if any(not example.options.get(doctest.SKIP) for example in test.examples):
                ran += 1
    assert ran == 26  # every example there is today; one more or less changes this number on purpose


def test_a_wrong_output_in_an_example_fails(tmp_path):
    test = doctest.DocTestParser().get_doctest(">>> 1 + 1\n3\n", {}, "broken", "broken.py", 0)
    results, report = run(test, tmp_path)
    assert results.failed == 1 and "Expected:\n    3\nGot:\n    2" in report
