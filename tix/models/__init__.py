"""Flax (Linen) versions of the Stable Diffusion components, NHWC inside, named after diffusers' modules."""
