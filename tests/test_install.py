"""The install rule (STYLE.md, principle 14): no module of ours shares its name with a module of an installed package.

The repository root is on sys.path when a script or a test runs, so a top-level file such as kernels.py is found
before the Hugging Face package `kernels` that transformers imports, and every transformers model import breaks.
"""
import importlib.metadata
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def top_level_modules(root=ROOT):
    """Import names this repository defines at its root: *.py files and folders with an __init__.py."""
    names = set()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if entry.endswith(".py") and os.path.isfile(path):
            names.add(entry[:-3])
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            names.add(entry)
    return names


def test_finds_our_modules():
    # The scan sees both kinds of top-level module, so the check below is not vacuous.
    names = top_level_modules()
    assert {"model", "text_encoders", "fastpath"} <= names and "tests" not in names


def test_no_module_shadows_an_installed_package():
    provided = importlib.metadata.packages_distributions()  # import name -> distributions that install it
    clashes = {name: provided[name] for name in sorted(top_level_modules()) if name in provided}
    assert not clashes, "rename these top-level modules; each hides an installed package of the same import name: " + \
        ", ".join(f"{name} (from {', '.join(sorted(set(dists)))})" for name, dists in clashes.items())


def test_no_module_shadows_the_standard_library():
    # The same collision with Python's own modules (a types.py or a code.py at the root) breaks imports too.
    clashes = sorted(top_level_modules() & set(sys.stdlib_module_names))
    assert not clashes, f"rename these top-level modules; each hides a standard-library module: {', '.join(clashes)}"
