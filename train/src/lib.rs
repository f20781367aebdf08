//! MASSV drafter training (projector pretraining, self-distillation, SDViT, TVD): see issue 7; nothing is implemented yet.
