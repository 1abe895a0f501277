"""The engine's errors. Each is raised for one image or one request, never for a whole batch."""


class ClipmaskError(Exception):
    """Base class of every error clipmask raises on purpose."""


class InvalidSpecError(ClipmaskError, ValueError):
    """Raised when a mask option is out of range; the message says which option and how to fix it."""


class ModelUnavailableError(ClipmaskError, OSError):
    """Raised when the CLIPSeg weights cannot be loaded; the message says how to provide them."""


class DeviceError(ClipmaskError, ValueError):
    """Raised when a ``--device`` value is malformed or names a device this machine lacks."""


class ImageError(ClipmaskError):
    """Raised for one image that cannot be masked; its message goes into the job manifest."""


class ImageDecodeError(ImageError, ValueError):
    """Raised when the bytes are not an image Pillow can decode (corrupt, truncated, unknown)."""


class ImageTooLargeError(ImageError, ValueError):
    """Raised when an image exceeds a size limit; the message names the option that raises it."""


class ImageTooSmallError(ImageError, ValueError):
    """Raised when an image is smaller than the model can see (one patch) in the chosen profile."""
