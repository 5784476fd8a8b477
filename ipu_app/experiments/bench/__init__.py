"""``python -m ipu_app bench kernels | train | data``: measured speed, one module per bench.

``kernels``: one sparse linear's forward and both gradients against the dense product; ``train``:
whole training steps of a config, sparse on each backend against dense (and Hugging Face's model);
``data``: the data pipeline. ``common`` holds the timing and the paper's epsilon and break-even.
Timings are medians over repeats, taken in one process on one machine; compare numbers only within
one run.
"""
