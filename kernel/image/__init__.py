"""Host side of the VM: building the image (kernel, Python, initramfs) and booting it in QEMU."""
