"""A Diffusers pipeline (SD 1.5 / 2.x, SDXL, PixArt-alpha / -Sigma, SD3 / SD3.5, CogVideoX) as a TDM task:
what `main.py` calls for `config.task = "diffusers"`, gathered from the modules that do each job.

- `description.py`: the pipeline folder read once (components, text encoders, VAE, scheduler);
- `backbones/`: the model families (UNet, PixArt, MMDiT, CogVideoX), one plug-in each: denoiser, prompt
  encoding, latent geometry;
- `text_encoders.py`, `vaes.py`: text encoders and VAEs by kind; `prompts.py`: prompt encoding;
- `geometry.py`: the latent geometry of a run (image or video latents, tokens, pixel multiples);
- `weights.py`: conversion into WORKDIR/converted, restore onto the mesh, shape-only random weights;
- `build.py`: the run (`Run`, read and checked once) and the `Task` (frozen weights, prompts,
  conditioning, LoRA or full students, step tables);
- `export.py`: the student as Diffusers folders a stock call samples right;
- `evaluate.py`: the evaluation table and `--mode=sample`.
"""

from tdm_jax.tasks.diffusers.build import Run, build_task, lora_config, make_run, step_table  # noqa: F401
from tdm_jax.tasks.diffusers.evaluate import evaluate, sample_prompts, stock_diffusers_images  # noqa: F401
from tdm_jax.tasks.diffusers.export import export, exported_pipeline  # noqa: F401
from tdm_jax.tasks.diffusers.weights import (converted_dir, ensure_converted, is_shape_only,  # noqa: F401
                                             reference_folder)
