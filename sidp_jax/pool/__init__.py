"""The SiDP weight pool: how a replica reaches FFN weights that live on other GPUs."""
