"""Raw data: pretrain_data.json collections, image IO, dataset builders, phantoms."""
