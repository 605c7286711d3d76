"""Keys the tests configure vpnd with (none of them protects anything)."""

#: A valid REALITY public key (x25519, base64url), for link building.
PUBLIC_KEY = "Z84J2IelR9ch3k8VtlVhhs5ycBUlXA7wHBWcBrjqnAw"
#: The REALITY short id tests put next to it.
SHORT_ID = "0123abcd"
