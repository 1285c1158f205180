"""Front end: layers written as index-notation equations (lang), VGG's layers and the optimizer's update as equations."""
