"""Neural-network layers built on ``fastxlstm.ops``."""
