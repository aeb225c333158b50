"""pgl_fast.models.cifar_resnet."""
