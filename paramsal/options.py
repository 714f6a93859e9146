"""The accepted values of paramsal's options, in one place that imports nothing heavy.

The engine, the analyses and the command line all take their choices from
here, so a value is spelled once, and ``paramsal --help`` can list every
choice without importing torch.
"""

from __future__ import annotations

# --------------------------------------------------------------------------------------------- the engine

#: Profiling backends; "auto" picks hooks, falling back to vmap (then loop) where hooks cannot serve a use.
BACKENDS = ("auto", "hooks", "vmap", "loop")
#: Named unit schemes (:func:`paramsal.units_of`); a callable is the other choice.
UNIT_SCHEMES = ("filters", "conv", "conv+linear", "linear-columns", "linear-rows", "embedding-rows", "heads",
                "neurons", "norm", "layer-scale", "position-embedding")
#: Per-unit aggregations: the paper's ``mean |g|`` and the released statistics' ``|mean g|``.
AGGREGATIONS = ("mean_abs", "abs_mean")
#: What the forward and backward pass compute in: float32, or bf16/fp16 under torch.autocast (reductions in float32).
COMPUTE_PRECISIONS = ("float32", "bf16", "fp16")
#: Which class a sample's loss is taken at, by name (a class index is the other choice): its label (the paper) or
#: the class the model predicts.
TARGETS = ("label", "predicted")
#: What a model is trained for, which decides each sample's loss (:mod:`paramsal.engine.tasks`).
TASKS = ("classification", "token-classification", "masked-lm", "causal-lm", "answer")
#: The tasks whose position t predicts the label at t + 1 (a causal LM's).
NEXT_TOKEN_TASKS = ("causal-lm", "answer")
#: A sequence task's label of a position that carries none (transformers' and PyTorch's convention).
IGNORE_INDEX = -100
#: What a bulk job does with a sample whose loss or gradient is NaN/inf.
NONFINITE_POLICIES = ("skip", "fail")
#: Devices, as the messages write them.
DEVICES = "cpu, cuda or cuda:N"
#: Row selections of a run by name (sample ids are the other choice).
ROW_SELECTIONS = ("misclassified", "correct", "nonfinite")
#: Image transforms of ``imagefolder:`` data.
TRANSFORMS = ("imagenet", "inception", "tensor")
#: Image decoders of ``imagefolder:`` data: torchvision.io (libjpeg-turbo into tensors: twice PIL's rate per core,
#: scripts/jpeg_decode.py) or PIL (what runs made before the choice existed used).
DECODERS = ("torchvision", "pil")
#: The decoder of a run whose source records none: runs made before the choice existed were decoded by PIL.
UNRECORDED_DECODE = "pil"

# --------------------------------------------------------------------------------------------- the analyses

#: How the units of a sample are ranked: the z-score (the paper) or the peaks-over-threshold tail score (Wang &
#: Sato 2023).
RANKINGS = ("zscore", "pot")
#: Reference sets a run's samples are standardized or scored against by name (another run is the other choice).
REFERENCES = ("all", "correct", "class")
#: The samples an analysis takes by name (sample ids are the other choice); the first is the default.
SAMPLE_SELECTIONS = ("misclassified", "correct")
#: Which k units of a sample an analysis edits or boosts.
UNIT_SELECTIONS = ("salient", "random", "least")
#: Fine-tuning also steps on every parameter.
FINETUNE_SELECTIONS = (*UNIT_SELECTIONS, "all")
#: The k recorded for fine-tuning's "all" (every parameter; no unit choice).
ALL_K = 0
#: Input-space saliency boosts a sample's salient units or random ones.
ATTRIBUTION_SELECTIONS = ("salient", "random")
#: Pruning turns units off ("zero") or adds Gaussian noise to their weights ("noise", paper A.5).
PRUNING_MODES = ("zero", "noise")
#: Spaces in which neighbours are found, and the samples they are found among.
SPACES = ("saliency", "features")
POOLS = ("all", "misclassified")
#: How neighbours' similarity products are taken (both give the exact float64 answer).
PRECISIONS = ("float32", "float64")
#: What masked pixels become: a blurred copy of the image (default), the image's mean, zero, or a number.
MASK_VALUES = ("blur", "mean", "zero")

PRUNING_KS = (1, 2, 5, 10, 20, 30, 50, 100)
FINETUNE_KS = (1, 5, 25, 75, 150, 300)
MASK_PERCENTS = (1, 5, 10, 20)

# --------------------------------------------------------------------------------------------- the benchmarks

#: ``paramsal bench --dataset``'s data: the demo's test split, or rows of ResNet-50's 26,560 units from a model whose
#: compute is cheap (what the host's work per row must keep up with).
DATASET_CASES = ("demo", "resnet50-rows")
