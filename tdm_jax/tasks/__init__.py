"""Tasks TDM distils, one subpackage each with its helpers: a vector toy, Diffusers pipelines, the shapes teachers."""
