"""A Diffusers pipeline (SD 1.5 / 2.x, SDXL, PixArt-alpha / -Sigma) as a TDM task: what `main.py`
calls for `config.task = "diffusers"`, gathered from the modules that do each job.

- `description.py`: the pipeline folder read once (components, text encoders, VAE, scheduler);
- `backbones/`: the denoiser families (UNet, PixArt), one plug-in each;
- `text_encoders.py`, `prompts.py`: text encoders by kind, prompt encoding per pipeline family;
- `weights.py`: conversion into WORKDIR/converted, restore onto the mesh, shape-only random weights;
- `build.py`: the `Task` (frozen weights, prompts, conditioning, LoRA or full students, step tables);
- `export.py`: the student as Diffusers folders a stock call samples right;
- `evaluate.py`: the evaluation table and `--mode=sample`.
"""

from tdm_jax.tasks.diffusers.build import build_task, lora_config, step_table  # noqa: F401
from tdm_jax.tasks.diffusers.evaluate import evaluate, sample_prompts, stock_diffusers_images  # noqa: F401
from tdm_jax.tasks.diffusers.export import export, exported_pipeline, exported_step_counts  # noqa: F401
from tdm_jax.tasks.diffusers.weights import (converted_dir, ensure_converted, is_shape_only,  # noqa: F401
                                             reference_folder)
