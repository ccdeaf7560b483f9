# Study 4 (load-balancing loss 0.01 against 0, E = 8): most loaded expert over the mean, and the
# expert-load heatmaps of the first seed. usage: gnuplot -e "dir='FIGURES'" plot_study4.gp
set terminal pngcairo size 900,560 font ",11"
set termoption noenhanced
set datafile missing "nan"
set grid
set xlabel "iteration"
set ylabel "max / mean tokens per expert (mean over Switch layers)"
file = dir."/study4_max_over_mean.dat"
stats file skip 1 nooutput
ncol = STATS_columns
set output dir."/study4_max_over_mean.png"
set title "Switch E = 8: load of the busiest expert, load-balancing coefficient 0.01 and 0"
plot for [i=2:ncol] file using 1:i with linespoints lw 2 pt 7 ps 0.6 title columnheader(i)

unset grid
load dir."/study4_axes.gp"
set ylabel "Switch layer and expert"
set cblabel "tokens / mean"
set palette defined (0 "white", 1 "yellow", 2 "red", 4 "black")
set cbrange [0:4]
set autoscale fix
do for [coef in "0.01 0"] {
  set output dir."/study4_heatmap_aux".coef.".png"
  set title "Expert load over training, load-balancing coefficient ".coef." (first seed)"
  plot dir."/study4_heatmap_aux".coef.".dat" using 1:2:3 with image notitle
}
