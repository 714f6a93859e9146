"""What ``paramsal bench`` measures: the cases and their models (:mod:`~paramsal.bench.models`), the timing
harness with its baselines (a plain forward+backward, the one-sample loop, whole-batch vmap, Opacus and BackPACK:
:mod:`~paramsal.bench.harness`), and the run-directory scale test (:mod:`~paramsal.bench.scale`)."""
