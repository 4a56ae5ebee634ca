"""Benchmarks of kdkernels.

    python -m bench                  time, peak memory and error of every provider (cli.py:
                                     providers.py what is timed, truth.py the float64
                                     ground truth, measure.py timing and memory,
                                     report.py table, targets and CSV, plot.py the PNG)
    python -m bench traffic ...      bytes per logit element of the Triton kernels (traffic.py)
    python -m bench distributed ...  vocab-parallel loss over gloo processes (distributed.py)
    pytest bench                     pytest-benchmark suite at small shapes (test_bench.py)
"""
