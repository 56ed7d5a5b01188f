import os

# Before anything imports torch: torch's OpenMP threads sleep instead of spin-waiting at barriers (see
# attnlab/__init__.py); on the shared 2-core machine spinning made 2-thread tests 5-20x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from attnlab.data.sources import dataset_folder

# The offline data, found the way the package finds it ($ATTNLAB_DATA, else ../shared/data): one place decides
# whether a test that needs it runs. With ATTNLAB_TESTS_REQUIRE_DATA=1 (CI sets it where it sees the data), a
# missing dataset fails those tests instead of skipping them, so a green run there means they ran.
REQUIRE_DATA = os.environ.get("ATTNLAB_TESTS_REQUIRE_DATA") == "1"


def load_benchmark(name: str):
    """A script of benchmarks/ imported as a module (they are scripts, not a package), for testing its functions."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_data(*names): the test reads these offline datasets "
                                       "(cifar10, tiny-imagenet); skipped where they are missing")


def require_dataset(name: str):
    """The dataset's folder, or skip (fail under ATTNLAB_TESTS_REQUIRE_DATA=1) when it is not there."""
    folder = dataset_folder(name)
    if folder is None:
        message = f"offline dataset '{name}' not found (set ATTNLAB_DATA or put it under ../shared/data)"
        if REQUIRE_DATA:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return folder


def pytest_runtest_setup(item):
    for marker in item.iter_markers("needs_data"):
        for name in marker.args:
            require_dataset(name)


@pytest.fixture(scope="session")
def cifar10_dir():
    return require_dataset("cifar10")


@pytest.fixture(scope="session")
def tiny_imagenet_dir():
    return require_dataset("tiny-imagenet")
