"""The samplers tix runs, by name, in a module that imports nothing, so the command line and the training config
can offer and check them without loading JAX (`tix.samplers` implements them)."""

SAMPLERS = ("ddim", "euler", "dpm++2m", "euler-karras", "dpm++2m-karras", "euler-ancestral", "dpm++2m-sde",
            "dpm++2m-sde-karras")
# A sampler name ending in this runs the sampler it names on Karras sigmas (`use_karras_sigmas=True` in diffusers).
KARRAS_SUFFIX = "-karras"
