"""GPU tests (run with JAX_EP_TEST_GPU=1, as scripts/gpu_suite.sh does).

tests/conftest.py sets the CPU defaults unless JAX_EP_TEST_GPU is set; this file
only registers the GPU suite's markers.
"""


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "multirank: needs several rank processes started by `python -m jax_ep.launch` "
        "(deselected in the single-process GPU run: -m 'not multirank')",
    )
