"""The vector toy task: a class-conditional mixture of Gaussians, its MLP teacher and evaluation."""
