"""The training driver: flags, initialisation, model, data, loop and checkpoints
around the pinned pip package megatron-core (`megatron.core`)."""

import warnings

# Without Transformer Engine and Apex (any CPU machine) megatron-core warns at
# import, once per module, that it falls back to torch: ten lines on stderr
# before anything runs, which would bury a one-line error. The driver's
# start-up line names the implementation that actually runs.
warnings.filterwarnings("ignore", message=r"(Transformer Engine and Apex are|Apex is) not installed",
                        category=UserWarning)
