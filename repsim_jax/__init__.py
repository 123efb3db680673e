"""repsim_jax: how pretrained vision models change when fine-tuned on medical images.

Modules: `train` (the trainer), `methods` (fine-tuning methods incl. RepSim), `optim.stiefel`
(Riemannian optax transforms), `similarity`, `sharpness`, `evaluation`, `transferability`, `data`,
`models`; `jobs` (the commands `config.job` selects). The command line is `python -m repsim_jax.main --config=configs/X.py --workdir=DIR`.
"""

__version__ = "0.1.0"
