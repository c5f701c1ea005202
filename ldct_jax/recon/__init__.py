"""Classical (non-learnt) reconstructions: the baselines learnt methods are compared with."""
