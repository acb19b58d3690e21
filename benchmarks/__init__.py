"""pyvit_ops performance lab: ``python -m benchmarks`` (see ``__main__``).

One script per operator (``scaled_dot_product_attention``, ``window_attention``,
``elsa_attention``, ``avg_pool2d``) describes its model shapes, inputs, naive PyTorch
composition and providers; ``harness`` times them; ``traffic.py`` measures memory
traffic in the Triton interpreter; ``static_report.py`` compiles every kernel for
sm_80 / sm_90a; ``targets`` checks the figures against the project's targets.
"""
