"""DDPO finetuning of Stable Diffusion with rewards scored in-process or by reward servers."""
