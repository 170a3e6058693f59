"""A small convolutional digit classifier that TorchScript can compile.

``forward(images)`` takes normalised images ``(batch, channels, height, width)`` and returns class
scores (logits). An adaptive pooling to 7x7 before the linear layer makes it accept any image size
(for the 28x28 crops of this example it changes nothing).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DigitCNN"]


class DigitCNN(nn.Module):
    """Two 3x3 convolutions, each followed by 2x2 max pooling, then a linear layer over the 7x7
    feature map.

    Args:
        num_classes: The number of labels.
        in_channels: 1 for grayscale images, 3 for RGB.
        width: Channels of the first convolution; the second has twice as many.
        dropout: Dropout before the linear layer while training.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d((7, 7)),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width * 7 * 7, num_classes))

    def forward(self, images: Tensor) -> Tensor:
        """Class scores of shape ``(batch, num_classes)``."""
        return self.classifier(self.features(images))
