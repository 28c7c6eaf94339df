"""A checkout's own tools, run from its root as ``python -m tools.NAME``: the benchmarks
(``bench``: `make bench`; ``bench_vllm``, ``bench_engine``, ``bench_serve``: the engine and
serving runs, on a CPU or a GPU), the demo, and the scaffolding the tests and benchmarks
share (``synthetic``: made-up step records; ``verify``: exactness against vLLM's outputs).
Not part of the installed package."""
