# Study 1 (dense against Switch E = 2..16): validation-loss curves, mean over seeds, and
# training against validation loss. usage: gnuplot -e "dir='FIGURES'" plot_study1.gp
set terminal pngcairo size 900,560 font ",11"
set termoption noenhanced
set datafile missing "nan"
set grid
set key top right
set xlabel "iteration"
set ylabel "validation cross-entropy (nats/byte)"

file = dir."/study1_val_curves.dat"
stats file skip 1 nooutput
ncol = STATS_columns
set linetype 1 lc rgb "black"
set linetype 2 lc rgb "#1f77b4"
set linetype 3 lc rgb "#2ca02c"
set linetype 4 lc rgb "#d62728"
set linetype 5 lc rgb "#9467bd"
set output dir."/study1_val_curves.png"
set title "Dense against Switch at equal FLOPs per token: validation loss (mean over seeds)"
plot for [i=2:ncol] file using 1:i with linespoints lw 2 pt 7 ps 0.6 lt (i-1) title columnheader(i)

# The same curves from 30% of training on, where they separate.
stats file using 1 skip 1 nooutput
set output dir."/study1_val_curves_zoom.png"
set title "The same, from 30% of training on"
set xrange [0.3 * STATS_max:STATS_max]
plot for [i=2:ncol] file using 1:i with linespoints lw 2 pt 7 ps 0.6 lt (i-1) title columnheader(i)
set xrange [*:*]

# Training loss averaged over each evaluation window beside the validation loss: a gap that
# grows with the expert count is overfitting.
file = dir."/study1_train_vs_val.dat"
stats file skip 1 nooutput
ncol = STATS_columns
set output dir."/study1_train_vs_val.png"
set title "Training (dashed) against validation (solid) loss, mean over seeds"
set ylabel "cross-entropy (nats/byte)"
plot for [i=2:ncol:2] file using 1:i with lines dt 2 lw 1.5 lt (i/2) title columnheader(i), \
     for [i=3:ncol:2] file using 1:i with lines lw 2 lt ((i-1)/2) title columnheader(i)
