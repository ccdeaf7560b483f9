set ytics ("speaker name" 0, "newline" 1, "space" 2, "upper case" 3, "lower case" 4, "punctuation" 5)
layers = "1 3"
experts = 8
